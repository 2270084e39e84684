from wadaemon.cli import main

raise SystemExit(main())
