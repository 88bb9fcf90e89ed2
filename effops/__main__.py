"""`python -m effops info`: what to paste into a bug report."""
import sys


def main(argv):
    if argv[:1] != ["info"]:
        print("usage: python -m effops info")
        return 2
    from effops.info import report
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
