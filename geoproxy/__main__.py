from geoproxy.cli import main

raise SystemExit(main())
