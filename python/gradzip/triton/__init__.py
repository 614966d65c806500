from ._common import INTERPRET as INTERPRET
