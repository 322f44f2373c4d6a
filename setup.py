from setuptools import find_packages, setup

setup(
    name="megatron_fapool",
    version="0.1.0",
    description="Long-context extension of Megatron-Core and DeepSpeed: attention pool, MA separation, dilated attention",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_fapool", "megatron_fapool.*"]),
    install_requires=[
        # The CPU build of torch 2.13.0 lies on disk on our machines; keep the pin exact
        # there (a looser spec makes pip fetch several GB of CUDA wheels).
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "deepspeed>=0.19,<0.20",
        "pydantic>=2,<3",
        "pyyaml>=6",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3"],
        # the checkpoint converter's Hugging Face commands (export-hf, import-hf, verify of HF folders)
        "hf": ["transformers>=5.23,<5.24", "safetensors>=0.8,<0.9"],
        # flash-attn builds from source against CUDA; optional (detected at import).
        "gpu": ["flash-attn>=2.6"],
    },
)
