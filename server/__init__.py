"""server: the signing server, the trust boundary that holds every user's keys in an HSM."""
