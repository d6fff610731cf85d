"""`python -m dbconvert` (also what `torchrun -m dbconvert` runs)."""

from dbconvert.cli import main

if __name__ == "__main__":
    main()
