"""The reference stamp: a regional service with a local SQLite store and asynchronous
last-write-wins replication to its peers. Shares only leaf modules with the proxy."""
