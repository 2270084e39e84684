"""wadaemon: keeps WhatsApp Web sessions alive across restarts, redeploys and lost disks."""

__version__ = "0.1.0"
