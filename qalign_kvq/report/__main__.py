import sys

from qalign_kvq.report import main

sys.exit(main())
