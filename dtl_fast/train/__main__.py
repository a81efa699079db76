"""`python -m dtl_fast.train ...` and `torchrun --nproc_per_node=N -m dtl_fast.train ...`."""
import sys

from dtl_fast.train.entry import main

sys.exit(main())
