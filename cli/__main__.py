import sys

from lieq_mlx_cli.main import main

sys.exit(main())
