// SQUALL_HOT marks the functions every keep-alive request runs through. GCC and clang place them
// together in .text.hot, so a request's own code spans a few pages instead of a part of a page
// in each object file it passes through.
#pragma once

#define SQUALL_HOT [[gnu::hot]]
