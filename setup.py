from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="biapy-ssl",
    version="0.1.0",
    description="Self-supervised pretraining (crappify, masking) and fine-tuning for 2D/3D microscopy images",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["biapy", "biapy.*"]),
    package_data={"biapy.config": ["*.txt"]},
    install_requires=requirements,
    extras_require={"nifti": ["nibabel"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["biapy=biapy.cli:main_entry"]},
)
