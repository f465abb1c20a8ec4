from setuptools import setup

setup(
    name="socksident",
    version="0.1.0",
    description="A SOCKS4 and SOCKS4A proxy server for Twisted with RFC 1413 IDENT verification",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["socksident", "socksident.rules", "twisted.plugins"],
    package_data={"socksident": ["py.typed"], "twisted": ["plugins/socksident_plugin.py", "plugins/socksident_endpoint.py"]},
    install_requires=["twisted>=23.10", "pyopenssl", "service_identity"],
    extras_require={
        "metrics": ["prometheus_client"],
        "test": ["pytest", "pytest-twisted", "pysocks", "python-socks", "hypothesis",
                 "prometheus_client", "mutmut==3.8.*"],
        "fuzz": ["atheris"],
        "typecheck": ["mypy==2.4.1", "mypy-zope==1.0.17"],
        "bench": ["matplotlib"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
