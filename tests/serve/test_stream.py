"""The settled prefix and the text pieces built from it."""

from dlmc.serve.stream import TextStream, settled

MASK, EOS, EOT = 3, 0, 2


def test_settled_stops_at_the_first_mask_or_stop_token():
    assert settled([5, 6, MASK, 7], MASK, {EOS, EOT}) == ([5, 6], False)
    assert settled([5, EOT, MASK, 7], MASK, {EOS, EOT}) == ([5], True)  # the stop is final, what follows is not read
    assert settled([5, 6, 7], MASK, {EOS, EOT}) == ([5, 6, 7], False)
    assert settled([MASK, 6], MASK, {EOS}) == ([], False)


class Bytes:
    """A tokenizer whose ids are UTF-8 bytes: a prefix can end inside a character."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_pieces_add_up_and_never_split_a_character():
    ids = list("aé€b".encode())
    stream = TextStream(Bytes())
    pieces = [stream.update(ids[:n]) for n in range(1, len(ids) + 1)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.finish("aé€b") == "aé€b"
    assert pieces[1] == "" and pieces[2] == "é"  # held back until the character's second byte arrives
