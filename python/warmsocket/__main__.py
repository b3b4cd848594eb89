from warmsocket.cli import main

raise SystemExit(main())
