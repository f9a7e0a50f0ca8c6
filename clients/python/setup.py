"""Generates the gRPC stubs from the protos while the package is built.

Every build (wheel, editable or not) runs ``grpc_tools.protoc`` over ``proto/credbroker/v1`` into
``src/credbroker/v1`` before setuptools collects the modules.
"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def generate():
    from grpc_tools import protoc  # a build requirement (pyproject.toml)
    import grpc_tools

    proto_dir = os.path.join(HERE, "proto")
    out = os.path.join(HERE, "src")
    protos = sorted(glob.glob(os.path.join(proto_dir, "credbroker", "v1", "*.proto")))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_dir}: build from a credbroker checkout")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed")


class BuildWithStubs(build_py):
    def run(self):
        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
