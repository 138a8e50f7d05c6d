"""A tracker summary and what TVM's query tool prints for it, shared by the
query tool's tests (``tests/test_query.py``, ``tests/test_query_tool.py``)."""

SUMMARY = {
    "queue_info": {
        "rasp3b": {"free": 1, "pending": 0},
        "v100": {"free": 0, "pending": 3},
        "gone": {"free": 0, "pending": 0},
    },
    "server_info": [
        {"key": "server:v100", "addr": ["10.0.0.3", 9091]},
        {"key": "server:rasp3b", "addr": ["10.0.0.2", 9090]},
    ],
}

#: What TVM's query_rpc_tracker prints for SUMMARY (after its address line).
SUMMARY_TEXT = (
    "Server List\n"
    "------------------------------\n"
    "server-address           key\n"
    "------------------------------\n"
    "10.0.0.2:9090            server:rasp3b\n"
    "10.0.0.3:9091            server:v100\n"
    "------------------------------\n"
    "\n"
    "Queue Status\n"
    "------------------------------\n"
    "key      total  free  pending\n"
    "------------------------------\n"
    "rasp3b   1      1     0      \n"
    "v100     1      0     3      \n"
    "------------------------------\n"
)
