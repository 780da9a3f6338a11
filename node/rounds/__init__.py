"""Rounds: the executor of the consensus core and everything around it.

``driver`` performs what ``consensus.RoundMachine`` asks (durable signed
messages, broadcasts, timeouts, verification, commits, evidence);
``records`` is the one place where a round's records are scored, compared
and turned into a commit plan; ``sync`` fetches and serves finalized rounds
and submissions, verifying every reply; ``chain`` tracks beacons.
"""
