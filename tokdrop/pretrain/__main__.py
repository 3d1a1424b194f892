"""`python -m tokdrop.pretrain` and `torchrun -m tokdrop.pretrain`: the `tokdrop pretrain` command."""

from tokdrop.pretrain import main

raise SystemExit(main())
