"""The one-file device bundle: C{python -m tvm_rpc.bundle -o tvm-rpc-server.pyz}.

A zipapp holding tvm_rpc and its pure-Python runtime dependencies that runs
C{rpc-server} in the foreground on a machine with nothing but Python 3:
L{contents} finds what goes in, L{archive} writes it, L{device} is what runs
on the device.
"""
