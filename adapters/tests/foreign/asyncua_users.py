"""An OPC UA server written by other people (python asyncua) that admits only user-name
tokens: user `ft` with the password given on the command line. One variable,
`ns=2;s=plant.press.temp` (a Double, 21.5, then +1 every 200 ms). Prints `ready PORT` once
it listens on 127.0.0.1:PORT. Used by adapters/tests/opcua.rs."""
import asyncio
import sys

from asyncua import Server, ua
from asyncua.server.user_managers import UserManager
from asyncua.crypto.permission_rules import User, UserRole


class OnlyFt(UserManager):
    def __init__(self, password):
        self.password = password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == "ft" and password == self.password:
            return User(role=UserRole.User)
        return None


async def main():
    port, password = int(sys.argv[1]), sys.argv[2]
    server = Server(user_manager=OnlyFt(password))
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.set_security_IDs(["Username"])
    idx = await server.register_namespace("urn:foreign:asyncua")
    obj = await server.nodes.objects.add_object(idx, "Press")
    var = await obj.add_variable(ua.NodeId("plant.press.temp", idx), "Temp", 21.5)
    async with server:
        print(f"ready {port}", flush=True)
        v = 21.5
        while True:
            await asyncio.sleep(0.2)
            v += 1.0
            await var.write_value(v)


asyncio.run(main())
