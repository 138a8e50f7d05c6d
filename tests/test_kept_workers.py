"""The client's store of kept workers' tokens (pure logic, a model-based property test)."""

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from tvm_rpc.client.kept_workers import KeptWorkers

pytestmark = pytest.mark.unit

ADDRESSES = ["a:1", "b:2", "c:3"]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("keep"), st.sampled_from(ADDRESSES), st.floats(0.5, 10)),
        st.tuples(st.just("take"), st.sampled_from(ADDRESSES), st.none()),
        st.tuples(st.just("wait"), st.none(), st.floats(0, 6)),
    ),
    max_size=60,
)


@settings(max_examples=500)
@given(operations)
def test_take_gives_the_newest_live_token_once(steps):
    """
    Whatever the sequence, C{take} gives the newest token of that address
    that has not expired and was not taken, each token at most once, and
    never more than C{per_address} are held per address.
    """
    now = [0.0]
    store = KeptWorkers(now=lambda: now[0], per_address=3, addresses=2)
    model = {}
    order = []
    taken = set()
    for number, (what, address, value) in enumerate(steps):
        if what == "wait":
            now[0] += value
        elif what == "keep":
            token = f"token-{number}"
            store.keep(address, token, value)
            live = [(t, d) for t, d in model.get(address, []) if d > now[0]]
            model[address] = (live + [(token, now[0] + value)])[-3:]
            if address in order:
                order.remove(address)
            order.append(address)
            if len(order) > 2:
                model.pop(order.pop(0), None)
        else:
            live = [(t, d) for t, d in model.pop(address, []) if d > now[0]]
            expected = live.pop()[0] if live else None
            if address in order:
                order.remove(address)
            if live:
                # Still holding tokens: now the most recently used address.
                model[address] = live
                order.append(address)
            got = store.take(address)
            assert got == expected
            assert got is None or got not in taken
            taken.add(got)


def test_nothing_kept_without_a_token_or_time():
    """An answer without a token or keep_for (an older server) keeps nothing."""
    store = KeptWorkers()
    store.keep("a:1", None, 5)
    store.keep("a:1", "t", None)
    store.keep("a:1", "t", 0)
    assert store.take("a:1") is None
