// A fixture of the include-rule test: detail/ includes no public header but tensor.hpp.
#pragma once
#include "posenc/attention.hpp"
