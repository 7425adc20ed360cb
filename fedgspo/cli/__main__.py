import sys

from fedgspo.cli.main import main

sys.exit(main())
