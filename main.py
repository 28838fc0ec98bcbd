"""Entry point: python main.py --config X.yaml --result_dir DIR --name NAME --run_id N [--gpu 0] [KEY VALUE ...]"""
from biapy.cli import exit_fast, main

if __name__ == "__main__":
    exit_fast(main())
