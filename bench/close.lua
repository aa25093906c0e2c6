-- A new connection for every request (bench/run.py --scenarios close): what clients
-- without keep-alive send, and what a burst of new visitors costs. wrk closes and
-- reopens its connection after each answer that says Connection: close.

wrk.headers["Connection"] = "close"
