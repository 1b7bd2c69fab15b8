"""cl_bidsapp.interfaces"""
