from anchore_objmig.cli import main

raise SystemExit(main())
