from uring_net.cli import main

raise SystemExit(main())
