"""System tests of the .deb in a booted systemd; see conftest.py (not collected by default)."""
