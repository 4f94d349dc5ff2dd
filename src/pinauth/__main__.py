from pinauth.cli import main

raise SystemExit(main())
