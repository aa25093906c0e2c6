from geoproxy.process.cli import main

raise SystemExit(main())
