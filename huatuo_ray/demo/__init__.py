"""The one-command demo (``make demo``) and the material it ships, written for this project."""
