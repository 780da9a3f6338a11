import pytest

from consensus.committee import Committee, Member
from consensus.messages import (
    Evidence,
    Proposal,
    QuorumCertificate,
    SignedProposal,
    SignedVote,
    Vote,
    VoteKind,
)
from node.intake.codec import pack
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.rounds.consensus_wire import (
    ConsensusWireError,
    decode_certificate,
    decode_evidence,
    decode_proposal,
    decode_signed,
    decode_vote,
    encode_certificate,
    encode_evidence,
    encode_proposal,
    encode_signed,
    encode_vote,
)


def _vote(signer: MessageSigner, kind: VoteKind, value: bytes | None, view: int = 0) -> SignedVote:
    vote = Vote(kind, 3, view, signer.key.public_key, value)
    return SignedVote(vote, signer.sign(Vote.DOMAIN, vote.body()))


def test_signed_messages_round_trip_and_verify():
    signer = MessageSigner(SigningKey.generate())
    me = signer.key.public_key
    proposal = Proposal(3, 1, me, (b"r1", b"r2"), 0)
    signed = SignedProposal(proposal, signer.sign(Proposal.DOMAIN, proposal.body()))
    again = decode_proposal(encode_proposal(signed))
    assert again == signed and again.verify(signer)
    assert decode_signed(encode_signed(signed)) == signed
    value_hash = proposal.value.digest(signer)
    for kind in VoteKind:
        for value in (value_hash, None):
            signed_vote = _vote(signer, kind, value)
            assert decode_vote(encode_vote(signed_vote)) == signed_vote
            assert decode_signed(encode_signed(signed_vote)) == signed_vote
    precommit = _vote(signer, VoteKind.PRECOMMIT, value_hash)
    certificate = QuorumCertificate(3, 0, value_hash, ((me, precommit.signature),))
    assert decode_certificate(encode_certificate(certificate)) == certificate
    committee = Committee(0, 10, 60, (Member("me", me, 1),))
    assert certificate.why_invalid(committee, signer) is None


def test_evidence_round_trips_and_proves_equivocation():
    signer = MessageSigner(SigningKey.generate())
    committee = Committee(0, 10, 60, (Member("me", signer.key.public_key, 1),))
    first = _vote(signer, VoteKind.PREVOTE, b"a" * 32)
    second = _vote(signer, VoteKind.PREVOTE, None)
    evidence = Evidence(first, second)
    again = decode_evidence(encode_evidence(evidence))
    assert again == evidence and again.why_invalid(committee, signer) is None
    other_view = _vote(signer, VoteKind.PREVOTE, None, view=1)
    assert Evidence(first, other_view).why_invalid(committee, signer) == "different_views"
    assert Evidence(first, first).why_invalid(committee, signer) == "not_conflicting"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        pack([1]),
        pack({"round": 1}),
        pack(
            {
                "kind": "prevote",
                "round": 1,
                "view": 0,
                "voter": b"x",
                "value_hash": b"",
                "sig": b"s",
            }
        ),
        pack(
            {
                "kind": "maybe",
                "round": 1,
                "view": 0,
                "voter": b"x" * 32,
                "value_hash": b"",
                "sig": b"s" * 64,
            }
        ),
        pack(
            {
                "round": 1,
                "view": 0,
                "proposer": b"x" * 32,
                "records": [],
                "valid_view": 5,
                "sig": b"s" * 64,
            }
        ),
    ],
)
def test_garbage_is_a_wire_error(raw):
    for decode in (decode_proposal, decode_vote, decode_certificate, decode_evidence):
        with pytest.raises(ConsensusWireError):
            decode(raw)
