from warmsocket.netem.cli import main

raise SystemExit(main())
