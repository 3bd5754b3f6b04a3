"""A first client: write, read back, list and change directory, all through rt.

Run it with `redoxcap run -- python examples/hello.py`. It reaches files only
through the namespace and cwd capabilities `redoxcap run` hands it: the
absolute paths below go to nsmgr as /scheme/file/..., the relative ones to
openat on the cwd fd.
"""

import rt

print("schemes in my namespace:", rt.schemes())
print("cwd:", rt.getcwd())

try:
    rt.mkdir("/hello")
except FileExistsError:
    pass
rt.chdir("/hello")
print("after chdir:", rt.getcwd())

with rt.open_file("hello.txt", "w") as f:  # relative: openat(cwd_fd, "hello.txt")
    f.write("Hello from a capability!\n")

with rt.open_file("/hello/hello.txt") as f:  # absolute: through the namespace
    print("read back:", f.read().strip())

fd = rt.open("hello.txt")
print("its scheme path:", rt.fpath(fd), "size:", rt.fstat(fd).st_size)
rt.close(fd)
print("listing of /hello:", rt.listdir())
