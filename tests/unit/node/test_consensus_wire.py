import pytest

from consensus.messages import Proposal, QuorumCertificate, SignedProposal, SignedVote, Vote
from node.intake.codec import pack
from node.rounds.consensus_wire import (
    ConsensusWireError,
    decode_certificate,
    decode_proposal,
    decode_vote,
    encode_certificate,
    encode_proposal,
    encode_vote,
)
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner


def test_signed_messages_round_trip_and_verify():
    signer = MessageSigner(SigningKey.generate())
    me = signer.key.public_key
    proposal = Proposal(3, me, (b"r1", b"r2"))
    signed = SignedProposal(proposal, signer.sign(Proposal.DOMAIN, proposal.body()))
    again = decode_proposal(encode_proposal(signed))
    assert again == signed and again.verify(signer)
    for value in (proposal.digest(signer), None):
        vote = Vote(3, me, value)
        signed_vote = SignedVote(vote, signer.sign(Vote.DOMAIN, vote.body()))
        assert decode_vote(encode_vote(signed_vote)) == signed_vote
    certificate = QuorumCertificate(3, None, ((me, signed_vote.signature),))
    assert decode_certificate(encode_certificate(certificate)) == certificate


@pytest.mark.parametrize("raw", [b"\xc1", pack([1]), pack({"round": 1}),
                                 pack({"round": 1, "voter": b"x", "proposal_hash": b"",
                                       "sig": b"s"})])
def test_garbage_is_a_wire_error(raw):
    for decode in (decode_proposal, decode_vote, decode_certificate):
        with pytest.raises(ConsensusWireError):
            decode(raw)
