from schemas import names


async def test_provisioned_queue_accepts_a_lane_message(js):
    ack = await js.publish(names.infer_submit("high"), b"{}")
    assert ack.stream == names.INFER_STREAM
