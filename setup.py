"""Strip-MLP in JAX/Flax: model, PyTorch weight converter, training and evaluation."""

from setuptools import find_packages, setup

setup(
    name="strip-mlp-jax",
    version="0.1.0",
    description="Strip-MLP (ICCV 2023) in JAX/Flax with bit-faithful PyTorch weight conversion",
    packages=find_packages(include=["strip_mlp", "strip_mlp.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "numpy>=1.24",
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11.20",
        "ml_collections>=0.1.1",
        "absl-py>=1.0",
        # The programs' host allocator (strip_mlp/runtime/host_allocator.py).
        'cmeel-mimalloc>=3.2; platform_system == "Linux" and platform_machine in "x86_64 aarch64"',
    ],
    extras_require={
        # tf.data / TFDS input pipeline (host side only; JAX keeps the accelerator).
        "data": [
            "tensorflow-cpu>=2.16",
            "tensorflow-datasets>=4.9.6",
            "importlib_resources",  # TFDS imports it to prepare datasets, without declaring it
            "scikit-learn>=1.3",
        ],
        # The TPU compiler (libtpu), to compile the train step for a TPU topology on any
        # machine (train.py --compile_for); a TPU host has it already.
        "tpu": ["jax[tpu]"],
        # Reading released PyTorch .pth files.
        "convert": ["torch>=2.4"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # two test processes: the suite is bound by single-threaded compiles
            "chex>=0.1.87",
            "tensorflow-cpu>=2.16",
            "tensorflow-datasets>=4.9.6",
            "importlib_resources",
            "scikit-learn>=1.3",
            "torch>=2.4",
            "jax[tpu]",  # libtpu: tests/test_compile_for.py compiles for TPU topologies
            "Pillow>=13",  # reference of tests/test_pil_parity.py (Pillow 13's resize pass order)
        ],
    },
)
