from wakeproxy.cli import main

raise SystemExit(main())
