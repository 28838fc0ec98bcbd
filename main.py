"""Entry point: python main.py --config X.yaml --result_dir DIR --name NAME --run_id N [--gpu 0] [KEY VALUE ...]"""
import sys

from biapy.cli import main

if __name__ == "__main__":
    sys.exit(main())
