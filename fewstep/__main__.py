"""`python -m fewstep ...` (as `fewstep ...`; what `torchrun -m fewstep train ...` runs)."""

from fewstep.cli import main

raise SystemExit(main())
