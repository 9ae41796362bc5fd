// A fixture of the include-rule test: the kernel must never include an encoder.
#pragma once
#include "posenc/encoders/alibi.hpp"
