from setuptools import find_packages, setup

setup(
    name="unetflow",
    version="0.2.0",
    description="Run and train a U-Net over microscopy images too big for one GPU: Zarr in, Dask blocks, Zarr out.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["unetflow", "unetflow.*"]),
    package_data={"unetflow": ["data/*.pt", "data/*.json", "data/*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "dask[array]>=2024.8",
        "distributed>=2024.8",
        "dask-jobqueue>=0.8.5",
        "zarr>=3.0.8",
        "numcodecs>=0.15",
        "tifffile>=2024.8",
        "h5py>=3.8",  # HDF5 inputs (file.h5:/dataset), the usual container of EM volumes
        "click>=8.1",
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",
        # Any torch with weights_only loading; install a CUDA build yourself for GPUs.
        "torch>=2.4",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2",
            # interoperability: a reader and a validator unetflow did not write, an S3 server on loopback
            "tensorstore>=0.1.60",
            "ome-zarr-models>=1.0",
            "ome-zarr>=0.11",  # ome-zarr-py: its multiscale writer makes inputs, its Reader opens outputs (issue 18)
            "moto[server]>=5",
            "s3fs>=2024.6",
            "pillow>=10",
            "ruff>=0.6",  # tests/test_architecture.py: the code is lint-clean (pyproject.toml [tool.ruff])
            "mypy>=1.10",  # ... and the core rooms type-check (pyproject.toml [tool.mypy])
            # tests/test_zoo.py (issue 19): packages built with the field's validator, checked by its runner
            "bioimageio.spec>=0.5.12",
            "bioimageio.core>=0.11",
            "monai>=1.3",  # tests/test_zoo.py: a network unetflow did not write
        ],
        "s3": ["s3fs>=2024.6"],
        "gcs": ["gcsfs>=2024.6"],
        "preview": ["matplotlib>=3.7"],
        # tests/test_viewers.py's napari, bioio and neuroglancer checks (headless, skipped without these;
        # neuroglancer's also needs Chromium and chromedriver: apt-get install chromium chromium-driver)
        "viewers": ["napari>=0.5", "napari-ome-zarr>=0.6", "bioio>=1.0", "bioio-ome-zarr>=1.0", "neuroglancer>=2.40", "selenium>=4.10"],
        # bioimage.io model packages: `unetflow model export`, `segment --model pkg.zip` (issue 19)
        "bioimageio": ["bioimageio.spec>=0.5.12", "bioimageio.core>=0.11"],
        # bench/run.py compares against MONAI's sliding_window_inference (issue 6)
        "bench": ["monai>=1.3"],
    },
    entry_points={"console_scripts": ["unetflow=unetflow.cli:main"]},
)
