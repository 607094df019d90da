"""The container images of deploy/docker/, built and run with podman."""
