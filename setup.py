"""l2w_dist: distributed training of dynamic early-exiting networks with L2W-DEN."""

from setuptools import find_packages, setup

# torch is pinned loosely: 2.4 is the oldest release with every torch.func and
# flop_counter API used here; clusters usually bring their own CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision>=0.19",
    "timm>=1.0",
    "webdataset>=0.2.86",
    "wandb>=0.17",
    "einops>=0.8",
    "submitit>=1.5",
    "pyyaml>=6.0",
    "numpy>=1.24",
    "matplotlib>=3.7",
    "tqdm>=4.66",
    "deepspeed>=0.14",
]

# NVIDIA DALI (data.backend: dali): ~425 MB wheel, ~1 GB installed, CPU pipelines work without
# a GPU; the CUDA 12 build also runs on newer drivers (a -cuda130 build exists too).
DALI = ["nvidia-dali-cuda120>=2.0"]
EXTRAS = {
    "dali": DALI,
    "test": ["pytest>=8", "ruff>=0.5", *DALI],  # the DALI tests run in CI, not skipped
}
EXTRAS["dev"] = EXTRAS["test"] + ["pytest-benchmark"]

setup(
    name="l2w_dist",
    version="0.1.0",
    description="Distributed training of dynamic early-exiting networks with L2W-DEN sample weighting",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["l2w_dist", "l2w_dist.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "l2w-train=l2w_dist.train:main",
            "l2w-eval=l2w_dist.validate:main",
            "l2w-infer=l2w_dist.infer.cli:main",
        ]
    },
)
