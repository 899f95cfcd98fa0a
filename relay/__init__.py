"""relay: the workstation's side of the network, and the root of the ``cardbridge`` command."""
