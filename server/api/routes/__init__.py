"""Routers: authentication, CSC signing, PIV operations, administration, audit, health."""
