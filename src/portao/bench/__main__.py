"""`python -m portao.bench …` until the `bench` group is wired into `portao`."""

from portao.bench.cli import bench

bench()
