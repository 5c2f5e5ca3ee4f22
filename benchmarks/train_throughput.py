"""Training/embedding throughput and pipeline efficiency: the same as `mproxy bench`."""

import sys

from momentum_proxy.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
