from ._common import INTERPRET
