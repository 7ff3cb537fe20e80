from setuptools import setup

setup(
    name="megatron-nsa",
    version="0.1.0",
    description="Native Sparse Attention (NSA) for Megatron-Core: reference, Triton kernels, context parallelism",
    python_requires=">=3.10",
    packages=["megatron_nsa", "nsa_kernels"],
    package_dir={"megatron_nsa": "megatron_nsa", "nsa_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system=='Linux'",
        "megatron-core>=0.16",
        "numpy",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={"test": ["pytest"]},
)
