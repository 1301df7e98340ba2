from fewshot.cli import main

raise SystemExit(main())
