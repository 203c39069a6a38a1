"""Attachment limits, enforced at HELLO: a refused client gets ERROR LIMIT, the others carry on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmfault.attach import AttachError
from shmfault.protocol import ErrorCode
from tests.integration.conftest import Service

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("flag", ["--max-attachments", "--max-attachments-per-uid"])
def test_attachments_beyond_the_limit_are_refused_until_one_ends(
    service_dir: Path, shm_prefix: str, flag: str
) -> None:
    service = Service(service_dir, shm_prefix, extra_args=[flag, "2"])
    service.start()
    with service.client() as client:
        region = client.create_region(4 * PAGE)
        first = client.attach(region.id)
        second = client.attach(region.id)
        with pytest.raises(AttachError) as refused:
            client.attach(region.id)
        assert refused.value.code is ErrorCode.LIMIT
        assert "limit" in str(refused.value)
        # The refused handshake redeemed nothing: the region counts two attachments.
        assert client.get_region(region.id).attachments == 2
        first.buffer[0] = 7  # the admitted ones are still served
        assert second.buffer[0] == 7
        first.detach()
        with client.attach(region.id) as third:
            assert third.buffer[0] == 7
        second.detach()
        assert client.get_region(region.id).attachments == 0
    assert service.stop() == 0
